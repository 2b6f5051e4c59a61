"""Function-preserving transforms: what they are (``base``), where they go (``sites``), and the
recipe-driven plans that build them (``plan``)."""
