"""anima_ft.eval"""
