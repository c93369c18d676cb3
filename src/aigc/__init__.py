"""AIGC: a self-hosted engine for vertical AI-generated content."""

__version__ = "0.1.0"
