"""A small residual BatchNorm CNN trained on scikit-learn's digits, with its test data."""
