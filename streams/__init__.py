"""streams: the faust-streaming app that decides when the keychain is warmed, purged, invalidated and swept."""
