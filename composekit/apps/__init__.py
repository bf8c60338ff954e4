"""Applications on top of the Compositor: the CLI, the HTTP service, Ray, the demo, random models."""
