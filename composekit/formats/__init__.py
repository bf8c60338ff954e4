"""Files on disk: safe JSON, model directories, export manifests, engine sidecars, images, atomic writes."""
