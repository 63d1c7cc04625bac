"""What runs inside fedtune pods: the party trainer, the aggregator, strategies and transfer.

Pods hold no storage credentials: every object is read and written through a presigned URL
handed over in a ticket.
"""

__version__ = "0.1.0"
