"""Datasets and loaders: timm's ImageFolder machinery, with the checks a user needs before hours of training."""
