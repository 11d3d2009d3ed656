"""anima_ft.observability"""
