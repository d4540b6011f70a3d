"""GPT-J 6B in JAX/Flax and its inference engine, in layers that import downwards only:

    nn/       the network (pure functions over pytrees)         ckpt/   weights on disk -> devices
    text/     tokenizer and incremental detokenisation           engine/ the device side (engine API)
    serving/  the host side: limits, scheduler, outputs, driver

plus the CLIs `python -m model.generate` and `python -m model.convert`. Nothing in this package
imports Ray; model.serving.request, model.engine.buckets, model.ckpt and model.text import no JAX
either (the app's CPU deployments use them)."""
