"""anima_ft.config"""
