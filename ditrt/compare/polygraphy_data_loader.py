"""A data loader for ``polygraphy run``: real noisy digits with valid labels.

    polygraphy run M.onnx --onnxrt --data-loader-script "$(python -c 'import ditrt.compare.polygraphy_data_loader as m; print(m.__file__)')"

Random int64 labels would index the label embedding out of range, and random timesteps are not
what the model sees. This yields the inputs of the built-in model's own sampling run (cond and
null-class rows). For another model set ``DITRT_MODEL`` to its checkpoint path.
"""

from __future__ import annotations

import os


def load_data():
    from ditrt.compare.inputs import record_feeds
    from ditrt.models.builtin import is_pixel_model, load_model

    model = load_model(os.environ.get("DITRT_MODEL", "builtin"))
    yield from record_feeds(model, steps="50", timesteps=3, samples=2, pixel_space=is_pixel_model(model))
