import lightning_phases.detectors.change as ch
def make(curve):
    return ch.DropDetector(direction="both", floor=curve["floor"])
