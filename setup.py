"""Adds jobs/ (the spark-submit scripts) to the distribution as the package mlimages_jobs."""
from setuptools import find_packages, setup

setup(packages=find_packages(include=["mlimages", "mlimages.*"]) + ["mlimages_jobs"])
