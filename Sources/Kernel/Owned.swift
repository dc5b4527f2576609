/// Holds one owned (`~Copyable`) kernel object where a Copyable container is needed (a
/// dictionary, an array); dropping the holder closes the object.
public final class Owned<Value: ~Copyable> {
    public let value: Value
    public init(_ value: consuming Value) { self.value = value }
}
