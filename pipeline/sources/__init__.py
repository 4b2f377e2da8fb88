"""Raw formats the converter reads, one module each.

Every source splits its work the same way, so the Beam job never holds a
dataset in memory and never makes one Beam element per example:

  list_examples(...)  runs in the driver: reads only names, headers and sizes
                      (CSV: one streaming pass) and returns a `common.Listing`:
                      the keys, their labels and raw splits when known up
                      front, the schema, and a picklable reader.
  reader.read(items)  runs in a Beam worker, once per output shard: streams the
                      shard's items in the order given and yields
                      `common.Record`s, or `common.Rejected` for bad ones.
"""
