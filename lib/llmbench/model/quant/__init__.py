"""model/quant"""
