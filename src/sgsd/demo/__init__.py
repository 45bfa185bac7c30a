"""The offline demo: a synthetic addition world, a warm-started tiny model, a labelled seed skill bank,
the replicated comparison of methods and its report (`sgsd demo`; docs/demo.md). Import the modules
themselves (`sgsd.demo.warmup`, `sgsd.demo.world`, `sgsd.demo.run`, ...)."""
