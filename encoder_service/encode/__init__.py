"""Encoding on the device: the engine an encoder actor holds (engine.py), one unit's way through it
and beside it (unit_encoder.py), the QA re-encode (qa.py) and its PSNR/SSIM (quality.py). Nothing
here knows Ray (job/stages.py adapts it)."""
