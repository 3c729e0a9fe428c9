"""voxanode: a peer-to-peer node daemon with a Kademlia DHT and a REST API."""

__version__ = "0.1.0"
