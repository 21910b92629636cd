"""rededit.models"""
