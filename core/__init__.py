"""What training, the model registry and serving all need, and nothing else.

`preprocess` (decode, validate, resize, normalise), `model` (the architecture
spec and its builder), `card` (the metadata stored with every model),
`engines` and `inference` (how a loaded model's forward pass runs). Imports
libraries only, never another package of this project.
"""
