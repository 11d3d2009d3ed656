"""anima_ft.data"""
