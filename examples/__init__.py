"""Examples: a task of your own (digits_task.py, digits.yaml) and analysis scripts on a finished run
(influential_points.py, predicted_vs_actual.py). A package so that `task.name: examples.digits_task:make_task`
imports from the repository root."""
