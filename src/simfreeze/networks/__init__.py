"""Networks: build them with their initial weights, map their layers, see them as chains of units."""
