"""The machine a run is on (named `system`, not `platform`, which would shadow the standard library's module
where lib/llmbench is the working directory): device, NPU chips, noise watch, energy meters, native builds,
the Jupyter kernel, provenance."""
