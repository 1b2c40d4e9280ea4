"""peerd: exchange AI model files securely between organisations, through an untrusted broker."""

__version__ = "0.1.0"
