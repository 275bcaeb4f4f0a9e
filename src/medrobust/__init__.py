"""medrobust: measure and improve the robustness of medical image classifiers."""

__version__ = "0.1.0"
