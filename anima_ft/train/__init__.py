"""anima_ft.train"""
