"""The contracts every stage agrees on, and nothing else: the bottom layer of ditrt.

It imports no stage (models, diffusion, calibrate, export, engines, runtime, compare, cli) and
every stage may import it:

- :mod:`~ditrt.contracts.errors`: the user-facing error hierarchy;
- :mod:`~ditrt.contracts.files`: atomic writes and the hashes artifacts are checked by;
- :mod:`~ditrt.contracts.precisions`: the precision registry (number formats, granularity,
  what TensorRT runs, the export dtype it needs, parity tolerances);
- :mod:`~ditrt.contracts.quantizers`: the Q/DQ semantics the simulation and the export share;
- :mod:`~ditrt.contracts.model_config`: the DiT architecture config and its named sizes;
- :mod:`~ditrt.contracts.recipe`: the quantization recipe artifact and its typed per-layer data;
- :mod:`~ditrt.contracts.spec`: the I/O contract of a DiT graph, engine or module;
- :mod:`~ditrt.contracts.groups`: the timestep-group manifest (one graph or engine per group);
- :mod:`~ditrt.contracts.profile` and :mod:`~ditrt.contracts.sidecar`: the engine build profile
  and the engine sidecar.
"""
