"""letrecipes: Late-to-Early Training recipes. Run them with `tune run letrecipes/<recipe>`."""

__version__ = "0.1.0"
