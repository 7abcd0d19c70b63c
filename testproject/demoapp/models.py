from django.db import models


class Counter(models.Model):
    """A row per name, bumped by each request: a realistic read and write."""

    name = models.CharField(max_length=100, unique=True)
    hits = models.BigIntegerField(default=0)
    updated = models.DateTimeField(auto_now=True)
