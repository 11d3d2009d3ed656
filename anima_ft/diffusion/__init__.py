"""anima_ft.diffusion"""
