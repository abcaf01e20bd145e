"""Student model and training: assembly (model.py, assemble.py), SFT data (data.py), DeepSpeed loop
(loop.py, launch.py, train.py), evaluation. Heavy imports (torch, transformers) stay inside functions."""
