"""Measurement: device-correct timing through the engine interface, device ceilings, tidy records, fidelity."""
