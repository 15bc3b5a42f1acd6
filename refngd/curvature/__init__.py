"""Curvature matrices with one interface: ``dense()``, ``@``, ``solve()``, ``to_linear_operator()``."""
from .base import CurvatureOperator, RowCurvature
from .exact import EmpiricalFisher, Fisher, ImprovedEmpiricalFisher, SampledFisher
from .ekfac import EKFAC
from .kfac import KFAC, LayerFactors
from .kron_diag import KroneckerDiagonal

__all__ = ["CurvatureOperator", "RowCurvature", "Fisher", "SampledFisher", "EmpiricalFisher",
           "ImprovedEmpiricalFisher", "KFAC", "EKFAC", "KroneckerDiagonal", "LayerFactors"]
