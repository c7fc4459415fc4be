"""One dynamic partition per batch that arrives in the landing folder."""

from dagster import DynamicPartitionsDefinition

batch_partitions = DynamicPartitionsDefinition(name="batches")
