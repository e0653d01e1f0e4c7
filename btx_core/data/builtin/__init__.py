"""The built-in demo corpora and the generators behind them."""
