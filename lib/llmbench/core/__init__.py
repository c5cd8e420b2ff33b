"""The lowest layer, torch-free: paths, errors (UserError, Unsupported), the configuration keys, statistics, files."""
