"""`moemerge-evolve`: search a recipe's parameters with CMA-ES, each candidate merged in memory and scored on Ray."""
