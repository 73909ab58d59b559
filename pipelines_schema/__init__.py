"""The `.kubeci.yml` pipeline language: JSON Schema, typed models, loader and validator.

This package imports nothing from the service (`bot`), so editors, pre-commit hooks and
other tools can use it alone.
"""

from pipelines_schema.loader import load_pipeline, validate_text
from pipelines_schema.problems import PipelineError, Problem

__all__ = ["PipelineError", "Problem", "load_pipeline", "validate_text"]
