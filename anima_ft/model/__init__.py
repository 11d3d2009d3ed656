"""anima_ft.model"""
