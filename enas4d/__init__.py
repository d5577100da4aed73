"""ENAS4D: efficient multi-stage CNN architecture search for dynamic inference."""
