"""spark-submit entry points, one per pipeline stage; installed as ``mlimages_jobs``."""
