"""rededit.data"""
