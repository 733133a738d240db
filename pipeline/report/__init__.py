"""Stage `report`: tables and plots from the evaluation and training results."""
