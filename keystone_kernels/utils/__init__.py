"""The bottom layer: small utilities that import nothing else of the package."""
