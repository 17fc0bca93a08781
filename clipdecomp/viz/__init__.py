"""Every figure: methods return data, this layer draws it (matplotlib, imported lazily)."""
