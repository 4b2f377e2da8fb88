# Two commands on a fresh machine:
#   make demo   convert the embedded demo dataset, train, resume, export
#   make test   run the test suite
# Both first install the project into .venv (once; again when setup.cfg changes).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEMO_DATA := data/shapes
DEMO_MODEL := runs/shapes

.PHONY: demo test clean

$(VENV)/installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

demo: $(VENV)/installed
	rm -rf $(DEMO_MODEL)
	# 1. Convert: writes the raw demo images, then shards + TFDS metadata.
	$(PY) -m pipeline.make_tfrecords --overwrite
	# 2. Train part of the way, and stop.
	$(PY) -m trainers.cnn --data_dir=$(DEMO_DATA) --model_dir=$(DEMO_MODEL) --augment --train_steps=300
	# 3. Run again with more steps: resumes from the step-300 checkpoint,
	#    evaluates, exports a SavedModel to $(DEMO_MODEL)/export.
	$(PY) -m trainers.cnn --data_dir=$(DEMO_DATA) --model_dir=$(DEMO_MODEL) --augment --train_steps=600
	# 4. Serve: the export classifies raw tf.Example records, TF only.
	$(PY) -m trainers.predict --export_dir=$(DEMO_MODEL)/export --data_dir=$(DEMO_DATA)

test: $(VENV)/installed
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) data runs
