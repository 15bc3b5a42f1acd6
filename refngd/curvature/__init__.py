"""Curvature matrices with one interface: ``dense()``, ``@``, ``solve()``, ``to_linear_operator()``."""
from .base import CurvatureOperator, RowCurvature
from .exact import EmpiricalFisher, Fisher, ImprovedEmpiricalFisher, SampledFisher

__all__ = ["CurvatureOperator", "RowCurvature", "Fisher", "SampledFisher", "EmpiricalFisher",
           "ImprovedEmpiricalFisher"]
