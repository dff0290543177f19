"""The GPT itself: building it from a recipe, its attention, MLP, loss and layout-independent initialisation."""
