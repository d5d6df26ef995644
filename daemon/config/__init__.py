"""The root config, its shared building blocks (units, secrets, auth, limits) and its loader."""
