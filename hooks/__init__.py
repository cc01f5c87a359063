"""Hook recipes (installed as the package ``ernie_lab._hooks``); load one with
``ernie_lab.interventions.load_recipe(name)``."""
